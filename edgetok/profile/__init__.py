"""Latency profiling with trtexec-grade statistics, dense vs reduced side by side, on CPU, GPU and Jetson."""
