"""The Doc2X hook: the connection and the API's calls."""
