"""Small, explicit work-arounds for third-party packages on our pinned stack (each documents why)."""
