"""blipserve: self-hosted BLIP-2 image-to-text."""
