//! warden-fencing (placeholder)
