"""The error of a setting the user can fix: a config, workdir or data set a run cannot use."""


class SetupError(ValueError):
  """A config, workdir or data set the run cannot use; the message says what to change."""
