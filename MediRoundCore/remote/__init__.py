"""The client side of `mediround serve` (standard library and numpy only): protocol and HTTP client."""
