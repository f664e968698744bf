"""The server-agent contract, defined once: schema names and versions, report markers, exit codes.

The agent (on the device) and the server (export writes bundles, deploy reads reports, compare joins
them) both import this module. It imports nothing, so it stays Python 3.6 and is copied with the agent.
"""

AGENT_VERSION = "1"

#: bundle manifest (manifest.json) written by ``redistill export``, checked by the agent
BUNDLE_SCHEMA = "redistill-bundle"
BUNDLE_SCHEMA_VERSION = 2  # 1: one input (the ``input`` key); 2: several inputs (``inputs`` list)

#: device report printed by the agent and saved by ``redistill deploy``
REPORT_SCHEMA = "redistill-device-report"
REPORT_SCHEMA_VERSION = 1

#: the report travels on the agent's stdout between these lines
REPORT_BEGIN = "===REDISTILL-REPORT-BEGIN==="
REPORT_END = "===REDISTILL-REPORT-END==="

#: a refusal or bad input: one stderr line ``ERROR_PREFIX kind: message``, exit code EXIT_REFUSED
ERROR_PREFIX = "REDISTILL-AGENT-ERROR:"
EXIT_OK = 0
EXIT_CRASHED = 1
EXIT_REFUSED = 3
