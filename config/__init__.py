"""Config: validated models (pydantic) and the factory that turns them into policies."""
