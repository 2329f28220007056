"""The export formats by name: the choices of `ipab export --format` and the keys of `run.WRITERS`.

Apart from the writers so that the command's parser names them without loading SQL, S3 or pyarrow.
"""

from __future__ import annotations

from typing import Final

FORMATS: Final = ("imagefolder", "webdataset", "parquet")
