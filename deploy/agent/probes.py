"""Memory probes: this process's resident memory (VmRSS, VmHWM), system RAM during a run, and heap trimming.

System RAM comes from ``tegrastats`` on a Jetson, else jtop, else /proc/meminfo; each figure says which.
"""

import re
import shutil
import subprocess
import threading

from .common import log, module_available


def proc_status_kb(field, pid="self"):
    try:
        with open("/proc/%s/status" % pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (IOError, OSError, ValueError):
        pass
    return None


def reset_peak_rss():
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except (IOError, OSError):
        return False


class RssSampler(object):
    """Samples this process's VmRSS in a thread: the fallback peak when VmHWM cannot be reset."""

    def __init__(self, interval=0.001):
        self.interval = interval
        self.peak_kb = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.daemon = True

    def _run(self):
        while not self._stop.is_set():
            kb = proc_status_kb("VmRSS")
            if kb is not None:
                self.peak_kb = max(self.peak_kb, kb)
                self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


TEGRA_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")


def parse_tegrastats_ram(line):
    """``RAM 2020/7852MB (lfb ...)`` -> (used_bytes, total_bytes), or None."""
    m = TEGRA_RAM.search(line)
    if not m:
        return None
    return int(m.group(1)) * 1024 * 1024, int(m.group(2)) * 1024 * 1024


def meminfo_used_bytes():
    vals = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2:
                    vals[parts[0].rstrip(":")] = int(parts[1]) * 1024
    except (IOError, OSError, ValueError):
        return None
    if "MemTotal" not in vals or "MemAvailable" not in vals:
        return None
    return vals["MemTotal"] - vals["MemAvailable"], vals["MemTotal"]


class SystemRamSampler(object):
    """System RAM in use during a run: ``tegrastats`` on a Jetson, else jtop, else /proc/meminfo."""

    def __init__(self, interval_ms=100):
        self.interval_ms = interval_ms
        self.samples = []
        self.total = None
        self.source = None
        self.how = None
        self._proc = None
        self._thread = None
        self._stop = threading.Event()

    def _add(self, used_total):
        if used_total:
            self.samples.append(used_total[0])
            self.total = used_total[1]

    def _read_tegrastats(self):
        for line in iter(self._proc.stdout.readline, ""):
            self._add(parse_tegrastats_ram(line))

    def _poll(self, read):
        while not self._stop.is_set():
            self._add(read())
            self._stop.wait(self.interval_ms / 1000.0)

    def __enter__(self):
        tegrastats = shutil.which("tegrastats")
        if tegrastats:
            try:
                self._proc = subprocess.Popen([tegrastats, "--interval", str(self.interval_ms)],
                                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                              universal_newlines=True)
                self.source = "tegrastats"
                self.how = "max of tegrastats 'RAM used/total' lines every %d ms during the memory run" % self.interval_ms
                self._thread = threading.Thread(target=self._read_tegrastats)
            except OSError:
                self._proc = None
        if self._proc is None and module_available("jtop"):
            try:
                from jtop import jtop  # jetson-stats; needs the jtop service
                self._jtop = jtop()
                self._jtop.start()

                def read():
                    ram = self._jtop.memory.get("RAM", {}) if hasattr(self._jtop, "memory") else {}
                    if "used" in ram and "tot" in ram:
                        return int(ram["used"]) * 1024, int(ram["tot"]) * 1024
                    return None
                self.source = "jtop"
                self.how = "max of jtop memory['RAM']['used'] polled every %d ms during the memory run" % self.interval_ms
                self._thread = threading.Thread(target=self._poll, args=(read,))
            except Exception as e:  # jtop service not running and the like
                log("jtop unavailable (%s); falling back to /proc/meminfo" % e)
                self._jtop = None
        if self._thread is None:
            self.source = "proc-meminfo"
            self.how = ("max of /proc/meminfo MemTotal - MemAvailable polled every %d ms during the memory run "
                        "(no tegrastats or jtop here)" % self.interval_ms)
            self._thread = threading.Thread(target=self._poll, args=(meminfo_used_bytes,))
        self._add(meminfo_used_bytes() if self.source == "proc-meminfo" else None)
        self._thread.daemon = True
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if getattr(self, "_jtop", None) is not None:
            try:
                self._jtop.close()
            except Exception:
                pass
        self._thread.join(timeout=5)

    def resolution(self):
        unit = 1 << 20 if self.source == "tegrastats" else 1024
        return {"resolution_bytes": unit,
                "resolution_how": "the unit %s reports (%s); every other process moves this figure too, so only "
                                  "differences of many MiB mean anything" % (self.source, "MB" if unit > 1024 else "kB")}

    def summary(self, before):
        if not self.samples:
            return dict({"bytes": None, "source": self.source, "what": "system RAM in use during the memory run",
                         "how": (self.how or "") + "; no samples were read"}, **self.resolution())
        return dict({"bytes": max(self.samples), "min_bytes": min(self.samples), "before_bytes": before,
                     "total_bytes": self.total, "samples": len(self.samples), "source": self.source,
                     "what": "system-wide RAM in use (all processes; on a Jetson the GPU shares this RAM) while the "
                             "model ran", "how": self.how}, **self.resolution())


# glibc: buffers of 64 KiB and more get their own pages and give them back when freed, so resident memory
# follows the live activations instead of hiding them in heap memory freed while the model was loaded.
MEMORY_PHASE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def trim_heap():
    """Return freed heap memory to the OS (glibc ``malloc_trim(0)``); False where there is no such call."""
    try:
        import ctypes
        import ctypes.util
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0)) or True
    except (OSError, AttributeError):
        return False
