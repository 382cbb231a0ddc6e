"""A free TCP port on localhost, for the tests that start a server or a process group."""
import socket


def free_port():
    """A port nothing listens on now (the OS picks it; a later bind may still race for it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
