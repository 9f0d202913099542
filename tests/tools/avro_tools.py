"""Apache Avro's Java command-line tools (``avro-tools``) from Maven Central.

The version is pinned in ``avro-tools-pom.xml`` next to this file. The jar is
resolved with Maven once into ``.tuo/cache/avro-tools`` and reused afterwards;
``python -m tests.tools.avro_tools`` resolves it ahead of time (scripts/test.sh does).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
POM = HERE / "avro-tools-pom.xml"
CACHE_DIR = HERE.parent.parent / ".tuo" / "cache" / "avro-tools"
_MAVEN = "{http://maven.apache.org/POM/4.0.0}"


class AvroToolsUnavailable(RuntimeError):
    """avro-tools could not be resolved (no Maven, no network, or a bad POM)."""


def pinned_version() -> str:
    """The avro-tools version the POM pins."""
    found = ET.parse(POM).getroot().findtext(f"{_MAVEN}properties/{_MAVEN}avro-tools.version")  # noqa: S314
    if not found:
        raise AvroToolsUnavailable(f"{POM} has no <avro-tools.version> property")
    return found.strip()


def ensure_avro_tools(cache_dir: Path = CACHE_DIR) -> Path:
    """The path of the avro-tools jar, downloading it with Maven only when it is not cached."""
    version = pinned_version()
    # Absolute: Maven resolves a relative output directory against the POM's folder.
    cache_dir = cache_dir.resolve()
    jar = cache_dir / f"avro-tools-{version}.jar"
    if jar.is_file():
        return jar
    if shutil.which("mvn") is None:
        raise AvroToolsUnavailable("Maven (mvn) is not installed; run scripts/setup.sh first")
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Download into a scratch folder and move the jar in whole, so an interrupted
    # download never leaves a truncated jar that later runs would take as cached.
    with tempfile.TemporaryDirectory(prefix=".resolving-", dir=cache_dir) as scratch:
        result = subprocess.run(
            [
                "mvn",
                "-q",
                "-B",
                "-f",
                str(POM),
                "dependency:copy-dependencies",
                "-DexcludeTransitive=true",
                f"-DoutputDirectory={scratch}",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        resolved = Path(scratch) / jar.name
        if result.returncode != 0 or not resolved.is_file():
            raise AvroToolsUnavailable(
                f"Maven could not resolve org.apache.avro:avro-tools:{version} (exit {result.returncode}):\n"
                f"{result.stdout[-2000:]}{result.stderr[-2000:]}"
            )
        resolved.replace(jar)
    return jar


if __name__ == "__main__":
    print(f"setup: avro-tools in {ensure_avro_tools()}")
