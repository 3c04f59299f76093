-- wrk script: POST the file BENCH_IMAGE as the body (BENCH_CONTENT_TYPE, default image/jpeg); print a JSON summary line at the end.
-- http_errors counts responses with status >= 400 (wrk's own tally).
-- With BENCH_REPEAT_RATE set (the response cache's benchmark), only that fraction of requests send
-- the file as it is; the rest append a unique suffix after the JPEG's end marker (decoders ignore
-- it; its sha256, so its cache key, is new every time).
wrk.method = "POST"
wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE") or "image/jpeg"
-- One more header, "Name: value" (the protocol's Inference-Header-Content-Length).
local extra = os.getenv("BENCH_HEADER")
if extra then
  local name, value = extra:match("^([^:]+):%s*(.*)$")
  wrk.headers[name] = value
end
local file = assert(io.open(os.getenv("BENCH_IMAGE"), "rb"))
wrk.body = file:read("*all")
file:close()

local repeat_rate = tonumber(os.getenv("BENCH_REPEAT_RATE") or "")
if repeat_rate then
  local counter = 0
  init = function(args)
    math.randomseed(os.time())
  end
  request = function()
    counter = counter + 1
    local body = wrk.body
    if math.random() >= repeat_rate then
      body = body .. string.format("unique-%d-%d", counter, math.random(1, 2147483647))
    end
    return wrk.format(nil, nil, nil, body)
  end
end

done = function(summary, latency, requests)
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "http_errors": %d, "connect_errors": %d, "read_errors": %d, ' ..
    '"timeouts": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect,
    summary.errors.read, summary.errors.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean))
end
