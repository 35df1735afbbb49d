//! warden-worker (placeholder)
