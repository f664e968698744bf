"""The agent's identity: which files make it and their one sha256, computed alike by the agent and the server.

The hash covers every ``*.py`` file of the agent folder (subfolders included, ``__pycache__`` not), in
sorted relative-path order, each as its path, its size and its bytes; the report carries it and the
server's ``deploy`` section records the one it copied.
"""

import hashlib
import os

AGENT_DIR = os.path.dirname(os.path.abspath(__file__))


def agent_files(folder=AGENT_DIR):
    """The agent's files as sorted ``/``-separated paths relative to ``folder``."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        for name in files:
            if name.endswith(".py") and not name.startswith("."):
                rel = os.path.relpath(os.path.join(root, name), folder)
                found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def agent_sha256(folder=AGENT_DIR):
    """One sha256 over the agent folder: for each file, its relative path, its size and its bytes."""
    h = hashlib.sha256()
    for rel in agent_files(folder):
        with open(os.path.join(folder, *rel.split("/")), "rb") as f:
            data = f.read()
        h.update(rel.encode("utf-8") + b"\0" + str(len(data)).encode("ascii") + b"\0")
        h.update(data)
    return h.hexdigest()
