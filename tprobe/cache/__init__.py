"""The embedding cache: store keys and formats, the extractor, status checks and export."""
