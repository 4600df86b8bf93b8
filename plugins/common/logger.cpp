#include "common/logger.h"

#include <atomic>

namespace edgetok
{
namespace
{
std::atomic<nvinfer1::ILoggerFinder*> gFinder{nullptr};
}

void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    gFinder.store(finder);
}

void log(nvinfer1::ILogger::Severity severity, char const* message)
{
    nvinfer1::ILoggerFinder* finder = gFinder.load();
    nvinfer1::ILogger* logger = finder ? finder->findLogger() : nullptr;
    if (logger)
        logger->log(severity, message);
}
} // namespace edgetok
