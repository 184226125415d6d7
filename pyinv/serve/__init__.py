"""The inversion service: invert an image once, answer edit after edit from the cached inversion."""
