-- make bench: wrk's summary as one JSON line on stdout (read by deploy/bench/web.py).
-- PACE_MS (environment): each connection waits this long between its requests (0: flat out).

local pace = tonumber(os.getenv("PACE_MS") or "0")

if pace > 0 then
  delay = function()
    return pace
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"max": %d, "mean": %.1f, "p50": %d, "p99": %d, "p999": %d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.max, latency.mean, latency:percentile(50), latency:percentile(99),
    latency:percentile(99.9)))
end
