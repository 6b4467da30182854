//! Limits of the control plane's wire and of the config files, with the reason for each value.

/// Largest discovery message either side accepts or sends. An `Endpoints` resource of 10,000
/// endpoints encodes to about 250 KiB; 16 MiB leaves room for the largest sets a mesh holds while
/// refusing a runaway message before it is buffered.
pub const MAX_XDS_MESSAGE: usize = 16 * 1024 * 1024;

/// Largest config file the proxy, `remora validate` and the control plane's directory read. A
/// config of 100,000 routes is about 10 MiB of YAML; 64 MiB leaves room for the largest meshes
/// while a runaway file (a log written to the wrong path, `/dev/zero`) is refused after reading
/// that much, not after exhausting memory.
pub const MAX_CONFIG_FILE: usize = 64 * 1024 * 1024;
