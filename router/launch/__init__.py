"""Process launch: the ``pdserve`` CLI, Ray and standalone workers, EP groups (README,
Architecture)."""
