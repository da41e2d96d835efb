// The official openai Node SDK against a gateway: prints one JSON object of what the SDK saw.
// Usage: node sdk.mjs <base_url> (keys in AISIX_KEY and AISIX_WRONG_KEY).
import OpenAI from "openai";

const baseURL = process.argv[2];
const client = new OpenAI({ baseURL, apiKey: process.env.AISIX_KEY, maxRetries: 0 });
const wrong = new OpenAI({ baseURL, apiKey: process.env.AISIX_WRONG_KEY, maxRetries: 0 });

async function failure(call) {
  try {
    await call();
  } catch (err) {
    return { status: err.status, code: err.code, param: err.param, request_id: err.requestID,
             header: err.headers?.get("x-aisix-request-id") };
  }
  return null;
}

const speech = await client.audio.speech
  .create({ model: "tts-prod", voice: "alloy", input: "hi" }).withResponse();
const audio = await speech.data.arrayBuffer();
const retrieved = await client.models.retrieve("tts-prod").withResponse();
const listed = [];
for await (const model of client.models.list()) listed.push(model.id);

console.log(JSON.stringify({
  speech: { request_id: speech.request_id, header: speech.response.headers.get("x-aisix-request-id"),
            bytes: audio.byteLength },
  retrieve: { model: retrieved.data, request_id: retrieved.request_id },
  listed,
  wrong_key: await failure(() => wrong.audio.speech.create({ model: "tts-prod", voice: "alloy", input: "hi" })),
  unknown_model: await failure(() => client.models.retrieve("no-such-model")),
}));
