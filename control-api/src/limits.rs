//! Limits of the control plane's wire, with the reason for each value.

/// Largest discovery message either side accepts or sends. An `Endpoints` resource of 10,000
/// endpoints encodes to about 250 KiB; 16 MiB leaves room for the largest sets a mesh holds while
/// refusing a runaway message before it is buffered.
pub const MAX_XDS_MESSAGE: usize = 16 * 1024 * 1024;
