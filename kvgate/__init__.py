"""Process wiring above both planes: the `kvgate` command, its sockets, signals and banners.

`lb` (the gateway) and `lb_operator` (the control plane) are libraries; this package assembles
them into processes (`kvgate gateway`, `up`, `status`, `serve`, `sim`) and holds the one settings
file a process reads (`kvgate.settings`).
"""
