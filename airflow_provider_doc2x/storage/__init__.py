"""Where images come from and results go: object storage through ``ObjectStoragePath``."""
