-- Shared by the wrk scripts: done() prints one machine-readable line that bench/run.py parses.
-- Latencies are in microseconds; "status" counts answers with status >= 400 (wrk's own rule).
local M = {}

function M.done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,' ..
      '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\n',
      summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
      e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end

-- A multipart/form-data body with the model field before the file, built once per wrk thread.
-- The file is pseudo-random bytes (a stand-in for compressed audio that no duration probe
-- claims), the same on every run; or, with BENCH_FILE_PATH, the first file_kib KiB of that file
-- (a real MP3: the gateway's probe then walks every frame).
function M.form(model, file_kib)
   local boundary = "----aisix-bench-7MA4YWxkTrZu0gW"
   local bytes = {}
   local path = os.getenv("BENCH_FILE_PATH")
   if path and path ~= "" then
      local f = assert(io.open(path, "rb"))
      bytes[1] = f:read(file_kib * 1024)
      f:close()
   else
      math.randomseed(42)
      for i = 1, file_kib * 1024 do
         bytes[i] = string.char(math.random(0, 255))
      end
   end
   local body = table.concat({
      "--", boundary, "\r\n",
      'Content-Disposition: form-data; name="model"\r\n\r\n', model, "\r\n",
      "--", boundary, "\r\n",
      'Content-Disposition: form-data; name="file"; filename="bench.mp3"\r\n',
      "Content-Type: audio/mpeg\r\n\r\n",
      table.concat(bytes), "\r\n",
      "--", boundary, "--\r\n",
   })
   return body, "multipart/form-data; boundary=" .. boundary
end

return M
