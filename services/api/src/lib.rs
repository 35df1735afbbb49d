//! warden-api (placeholder)
