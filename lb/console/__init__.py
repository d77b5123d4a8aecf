"""The web console and its JSON status API, served at ``/ui`` beside the OpenAI routes.

Nothing here is on the request path: the page and its API are small Starlette routes, and the
traffic figures come from the gateway's own counters, sampled once a second by a background
task (``window``). ``status`` assembles what the page and ``kvgate status`` show, ``ring_view``
draws a model's hash ring, ``routes`` mounts it all behind the API keys when they are on.
"""
