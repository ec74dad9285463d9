"""The HTTP surface: each module is one group of routes with its wire (pydantic) models;
`deps` holds the request-scoped getters the routes take. server/app.py includes them."""
