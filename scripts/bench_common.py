"""Helpers shared by the Python reference benches."""


def peak_rss_mib():
    """Peak resident set (VmHWM) of this process in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return float("nan")
