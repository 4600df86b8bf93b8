"""`edgetok tune`: the fastest engine for a model on a device within an accuracy budget, searched with Optuna
over the method registry's options, precision, attention and plugins, its trials run on a Ray fleet.

- ``space``: the search space, derived from edgetok.vit.methods and the export/quantize/build options.
- ``study``: the Optuna study (resumable, in the output folder) and the order of work, cheapest first;
  :func:`run_study` is the Python entry point (``TuneOptions(..., trials=8, workers=2)``).
- ``fleet``: Ray: CPU tasks for export/quantize/eval, one actor per device for build and profile.
- ``trial``: what a worker runs for one trial.
- ``report``: tune.json, pareto.md/png, best.yaml and the progress line.
"""
