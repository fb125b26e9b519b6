"""The shared worker layer both worker roles build on (README, Architecture)."""
