//! warden-trigger (placeholder)
