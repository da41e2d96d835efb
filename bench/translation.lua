-- wrk -s bench/translation.lua http://HOST:PORT/v1/audio/translations
-- The same multipart upload as transcription.lua, for the translations route
-- (measured when BENCH_ROUTES includes "translation").
-- BENCH_KEY: the caller key; BENCH_STT_MODEL: the alias; BENCH_FILE_KIB: file size (default 256).
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local report = dofile(here .. "report.lua")

local body, content_type = report.form(os.getenv("BENCH_STT_MODEL") or "whisper-bench",
                                       tonumber(os.getenv("BENCH_FILE_KIB") or "256"))
wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = content_type
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_KEY") or "sk-bench")

done = report.done
