"""KubeAI's messenger: inference requests arriving as broker messages, answered on another topic.

``config`` is the `messaging:` section (KubeAI's ``streams`` shape), ``urls`` reads the broker
URLs, ``broker`` is the small interface every broker implements (``nats_jetstream``,
``rabbitmq``), ``messenger`` runs one stream through the gateway's own routing, and
``service.Messaging`` ties the streams to one gateway process's life."""
