-- wrk -s bench/speech.lua http://HOST:PORT/v1/audio/speech
-- A typical SDK speech request; the fast upstream answers 64 KiB of MP3 frames.
-- BENCH_KEY: the caller key (aisix checks it, the others ignore it); BENCH_TTS_MODEL: the alias.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local report = dofile(here .. "report.lua")

wrk.method = "POST"
wrk.body = string.format(
   '{"model":"%s","input":"The quick brown fox jumps over the lazy dog, twice.","voice":"alloy",' ..
   '"response_format":"mp3"}', os.getenv("BENCH_TTS_MODEL") or "tts-bench")
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_KEY") or "sk-bench")

done = report.done
