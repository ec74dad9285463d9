"""The server's API, one small class per resource (inference, A/B experiments,
adapters, aliases, tenants), composed into `clients._api.Endpoints`.

Each method only *describes* its call (an `Op`); `calls.endpoint` makes it run on
either client.
"""
