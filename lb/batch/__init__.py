"""OpenAI's Files and Batches API on an embedded store: upload a JSONL file, create a batch,
poll it, download the results. ``store`` keeps files and batches, ``jsonl`` reads and writes
the batch file formats, ``limits`` holds the checks that span a batch's lines (one model, line
size, embedding inputs), ``runner`` runs batches through the gateway's own routing
(``lb.loopback``: requests through the gateway's ASGI app in-process), ``expiry`` reads
expiration policies and sweeps expired files, ``api`` serves the routes; ``service.Batches``
ties them to one gateway process's life."""
