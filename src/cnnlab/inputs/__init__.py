"""One path from images (files, arrays, canvas exports, photos) to a model's input."""
