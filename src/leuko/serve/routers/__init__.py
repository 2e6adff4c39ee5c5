"""The lab service's routers beyond the stateless endpoints of :mod:`leuko.serve.app`."""
