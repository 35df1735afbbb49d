//! warden-scheduler (placeholder)
