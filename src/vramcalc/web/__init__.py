"""The page of `vramcalc serve` (index.html, app.js, style.css), shipped in the wheel."""
