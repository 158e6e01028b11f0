"""The Doc2X operator: images in, Markdown out."""
