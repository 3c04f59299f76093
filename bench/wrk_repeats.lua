-- wrk script: POST the JPEG BENCH_IMAGE; a fraction BENCH_REPEAT_RATE of requests send it as it
-- is (the same bytes every time: a cache hit once cached), the rest append a unique suffix after
-- the JPEG's end marker (decoders ignore it; its sha256, so its cache key, is new every time).
-- Prints the same JSON summary line as wrk_post.lua.
local file = assert(io.open(os.getenv("BENCH_IMAGE"), "rb"))
local image = file:read("*all")
file:close()
local repeat_rate = tonumber(os.getenv("BENCH_REPEAT_RATE") or "0")
local headers = { ["Content-Type"] = "image/jpeg" }
local counter = 0

init = function(args)
  math.randomseed(os.time())
end

request = function()
  counter = counter + 1
  local body = image
  if math.random() >= repeat_rate then
    body = image .. string.format("unique-%d-%d", counter, math.random(1, 2147483647))
  end
  return wrk.format("POST", nil, headers, body)
end

done = function(summary, latency, requests)
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "http_errors": %d, "connect_errors": %d, "read_errors": %d, ' ..
    '"timeouts": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect,
    summary.errors.read, summary.errors.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean))
end
