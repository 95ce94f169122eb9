// The two kinds of foreign source, behind open_source().
#pragma once

#include "tandem/engine/volume.h"
#include "tandem/importer/source.h"

namespace tandem::importer {

asio::awaitable<Result<std::unique_ptr<ForeignSource>>> open_nbd_source(asio::any_io_executor ex, std::string uri,
                                                                        SourceOptions opts);
asio::awaitable<Result<std::unique_ptr<ForeignSource>>> open_file_source(engine::DeviceEnv& env, std::string path);

}  // namespace tandem::importer
