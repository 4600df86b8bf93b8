// TensorRT's logger, as setLoggerFinder hands it to the library: every refusal and driver error becomes one
// line there (TensorRT itself only reports that a plugin callback failed).
#pragma once
#include "NvInferRuntime.h"
#include <string>

namespace edgetok
{
void setLoggerFinder(nvinfer1::ILoggerFinder* finder);
//! One line at ``severity``; dropped when TensorRT gave no logger finder (or its finder has no logger).
void log(nvinfer1::ILogger::Severity severity, char const* message);
inline void log(nvinfer1::ILogger::Severity severity, std::string const& message)
{
    log(severity, message.c_str());
}
} // namespace edgetok
