"""The server-agent contract, defined once: schema names and versions, report markers, exit codes, options.

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

PRECISIONS = ("auto", "fp32", "fp16", "int8")

#: the device-wide measurement lock is this file (default: redistill-agent.lock in the temp folder, /tmp)
LOCK_ENV = "REDISTILL_AGENT_LOCK"


#: the batch-1 resident-memory delta cannot tell apart figures closer than this: 24 deploys of one bundle measured
#: 112-300 KiB (buffers under the 64 KiB mmap threshold come from the heap, whose reuse RSS does not show)
RSS_DELTA_RESOLUTION_BYTES = 192 * 1024


def batch_list(text):
    """``1,4,16,64`` -> (1, 4, 16, 64); ``none`` -> () (no per-image slope). A bad item raises ValueError."""
    text = str(text).strip().lower()
    if text in ("", "none", "off"):
        return ()
    return tuple(int(x) for x in text.split(","))


def format_batch_list(batches):
    return ",".join(str(b) for b in batches) or "none"


class Option(object):
    """One measurement option of the agent; the agent, ``redistill deploy`` and the loopback bench all take it.
    ``format`` writes a parsed value back as the agent argument (default ``str``); ``minimum`` and ``maximum`` apply
    to every item of a tuple value."""

    __slots__ = ("flag", "type", "default", "help", "choices", "minimum", "maximum", "format")

    def __init__(self, flag, type, default, help, choices=None, minimum=None, maximum=None, format=str):
        self.flag = flag
        self.type = type
        self.default = default
        self.help = help
        self.choices = choices
        self.minimum = minimum
        self.maximum = maximum
        self.format = format

    @property
    def dest(self):
        return self.flag[2:].replace("-", "_")


#: the measurement options, defined once: parsers are generated from them and their values passed through
MEASURE_OPTIONS = (
    # choices: "auto" + the agent's backend registry (backends.registry.backend_choices), given by each parser
    Option("--backend", str, "auto", "auto = the first importable backend: tensorrt (with pycuda or cuda-python), "
           "else onnxruntime"),
    Option("--precision", str, "auto", "auto = the bundle's precision; fp16 is the TX2's fast path (TensorRT only)",
           choices=PRECISIONS),
    Option("--batch", int, 1, "batch size for latency and memory (dynamic-batch bundles)", minimum=1),
    Option("--warmup", int, 20, "discarded warm-up calls before the timed ones", minimum=0),
    Option("--iters", int, 200, "timed latency iterations", minimum=1),
    Option("--mem-iters", int, 20, "inferences in the separate memory run", minimum=1),
    Option("--sample-ms", int, 100, "system RAM sampling interval in ms during the memory run", minimum=1),
    Option("--threads", int, 0, "onnxruntime intra-op threads (0 = its default)", minimum=0),
    Option("--ort-device", str, "auto", "onnxruntime execution provider (auto = CUDA when onnxruntime has it)",
           choices=("auto", "cpu", "cuda")),
    Option("--workspace-mb", int, 256, "TensorRT builder workspace in MiB", minimum=1),
    Option("--min-top1", float, 0.9, "top-1 agreement the output check needs", minimum=0, maximum=1),
    Option("--slope-batches", batch_list, "1,4,16,64", "batch sizes of the per-image memory slope, each measured in a "
           "fresh process (dynamic-batch bundles; none = skip)", minimum=1, format=format_batch_list),
)


def add_measure_options(parser, choices=None, defaults=None, exclude=()):
    """Add the measurement options to an argparse parser: ``choices`` and ``defaults`` override an option's by dest
    name (``choices={"backend": backend_choices()}``), ``exclude`` leaves options out (the caller then sets their
    values, e.g. with ``parser.set_defaults``)."""
    choices = choices or {}
    defaults = defaults or {}
    unknown = sorted((set(choices) | set(defaults) | set(exclude)) - set(o.dest for o in MEASURE_OPTIONS))
    if unknown:
        raise ValueError("no measurement option %s; see MEASURE_OPTIONS" % ", ".join(unknown))
    for o in MEASURE_OPTIONS:
        if o.dest in exclude:
            continue
        default = defaults.get(o.dest, o.default)
        parser.add_argument(o.flag, type=o.type, default=default, choices=choices.get(o.dest, o.choices),
                            help="%s (default: %s)" % (o.help, default))


def measure_option_error(namespace):
    """The first measurement option outside its range as one line, or None when all are valid."""
    for o in MEASURE_OPTIONS:
        value = getattr(namespace, o.dest)
        for item in (value if isinstance(value, tuple) else (value,)):
            if o.minimum is not None and item < o.minimum:
                return "%s must be at least %s (got %s)" % (o.flag, o.minimum, item)
            if o.maximum is not None and item > o.maximum:
                return "%s must be at most %s (got %s)" % (o.flag, o.maximum, item)
    batches = getattr(namespace, "slope_batches", ())
    if batches and len(set(batches)) < 3:  # two points always fit a line exactly: no residual, no resolution
        return "--slope-batches needs at least three different batch sizes (got %s), or none" % format_batch_list(batches)
    return None


def measure_argv(namespace):
    """Every measurement option of a parsed namespace as agent arguments (``--flag value`` pairs, table order)."""
    argv = []
    for o in MEASURE_OPTIONS:
        argv += [o.flag, o.format(getattr(namespace, o.dest))]
    return argv
