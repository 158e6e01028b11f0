"""The image lane, worker side: one upload per image through the image API, and its records."""
