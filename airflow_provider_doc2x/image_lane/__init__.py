"""The image lane, worker side: one upload per image through the image API, side by side, paced."""
