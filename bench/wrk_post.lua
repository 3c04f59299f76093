-- wrk script: POST the file BENCH_IMAGE as the body (BENCH_CONTENT_TYPE, default image/jpeg); print a JSON summary line at the end.
-- http_errors counts responses with status >= 400 (wrk's own tally).
wrk.method = "POST"
wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE") or "image/jpeg"
local file = assert(io.open(os.getenv("BENCH_IMAGE"), "rb"))
wrk.body = file:read("*all")
file:close()

done = function(summary, latency, requests)
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "http_errors": %d, "connect_errors": %d, "read_errors": %d, ' ..
    '"timeouts": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect,
    summary.errors.read, summary.errors.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean))
end
