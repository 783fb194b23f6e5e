// Server-Sent Events over fetch(): EventSource cannot send an Authorization header, so the
// text/event-stream format is read here from a ReadableStream. A dropped connection is
// reopened with Last-Event-ID (the server continues after it); a stream the server ended is
// not, unless `reconnectOnEnd()` says so.

import { authHeaders, unauthorized } from "./api.js";

const MAX_BACKOFF_MS = 5000;

/**
 * openStream(url, {onEvent(kind, data, id), onOpen(), onEnd(), onError(err), reconnectOnEnd})
 * returns {close(), get lastEventId()}.
 */
export function openStream(url, handlers) {
  const { onEvent, onOpen, onEnd, onError, reconnectOnEnd } = handlers;
  const controller = new AbortController();
  let lastEventId = handlers.lastEventId || "";
  let closed = false;
  let backoff = 250;

  async function connectOnce() {
    const headers = authHeaders({ Accept: "text/event-stream" });
    if (lastEventId) headers["Last-Event-ID"] = lastEventId;
    const response = await fetch(url, {
      headers, signal: controller.signal, cache: "no-store", credentials: "omit",
    });
    if (response.status === 401) {
      unauthorized();
      return "stop";
    }
    if (response.status === 404) {
      onError?.(new Error("not found"));
      return "stop";
    }
    if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
    backoff = 250;
    onOpen?.();
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let id = "";
    let kind = "";
    let data = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let start = 0;
      for (;;) {
        const nl = buffer.indexOf("\n", start);
        if (nl < 0) break;
        let line = buffer.slice(start, nl);
        start = nl + 1;
        if (line.endsWith("\r")) line = line.slice(0, -1);
        if (line === "") {
          if (data.length) {
            if (id) lastEventId = id;
            let parsed = null;
            try {
              parsed = JSON.parse(data.join("\n"));
            } catch {
              parsed = null;
            }
            if (parsed !== null) onEvent(kind || "message", parsed, id);
          }
          id = "";
          kind = "";
          data = [];
          continue;
        }
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? "" : line.slice(colon + 1);
        if (val.startsWith(" ")) val = val.slice(1);
        if (field === "data") data.push(val);
        else if (field === "event") kind = val;
        else if (field === "id" && !val.includes("\0")) id = val;
      }
      buffer = buffer.slice(start);
    }
    return "ended";
  }

  (async () => {
    while (!closed) {
      let outcome;
      try {
        outcome = await connectOnce();
      } catch (err) {
        if (closed || controller.signal.aborted) return;
        onError?.(err);
        await new Promise((resolve) => setTimeout(resolve, backoff));
        backoff = Math.min(MAX_BACKOFF_MS, backoff * 2);
        continue;
      }
      if (outcome === "stop" || closed) return;
      if (!(reconnectOnEnd && reconnectOnEnd())) {
        closed = true;
        onEnd?.();
        return;
      }
      await new Promise((resolve) => setTimeout(resolve, backoff));
    }
  })();

  return {
    close() {
      closed = true;
      controller.abort();
    },
    get lastEventId() {
      return lastEventId;
    },
    get closed() {
      return closed;
    },
  };
}
