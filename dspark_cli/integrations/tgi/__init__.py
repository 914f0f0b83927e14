"""DSpark for TGI v3.3.7: what patches/tgi/v3.3.7 hooks into the server."""
