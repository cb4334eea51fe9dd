"""What every app of the service shares and that depends on none of them: the domain
error type and the console helpers of the management commands."""
