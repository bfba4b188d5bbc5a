// A picked, dropped or pasted file, or a URL -> the image the page talks about:
// {name, fileName, mimeType, source, thumbnail}. `source` is what the server is sent (a
// data: URL, or the http(s) URL itself); `fileName` is null for a URL. Problems a person
// can fix throw an Error whose message says what to do.

const SHOWN_TYPES = "PNG, JPEG, GIF, WebP or BMP";

/** A size for people: "734 KB", "20 MB". */
export function megabytes(bytes) {
  if (bytes < 2 ** 20) return `${Math.max(1, Math.round(bytes / 1024))} KB`;
  return `${(bytes / 2 ** 20).toFixed(1).replace(/\.0$/, "")} MB`;
}

export async function imageFromFile(file, maxBytes) {
  const name = file.name || `pasted-image.${(file.type.split("/")[1] || "png")}`;
  if (file.size === 0) throw new Error(`${name} is empty. Choose an image file.`);
  if (file.size > maxBytes) {
    throw new Error(
      `${name} is larger than the ${megabytes(maxBytes)} this server takes. Choose a smaller image.`,
    );
  }
  const source = await readAsDataUrl(file);
  const shown = await canShow(source);
  if (!shown && !file.type.startsWith("image/")) {
    const kind = file.type ? ` (${file.type})` : "";
    throw new Error(`${name} is not an image${kind}. Choose a ${SHOWN_TYPES} file.`);
  }
  return {
    name,
    fileName: name,
    mimeType: file.type.startsWith("image/") ? file.type : "image/png",
    source,
    thumbnail: shown ? source : null, // a format the browser cannot show: the server decides
  };
}

export function imageFromUrl(text) {
  const url = text.trim();
  if (!/^(https?:\/\/|data:image\/)/i.test(url)) {
    throw new Error("Give an http(s) URL of an image, or a data:image/… URL.");
  }
  const name = url.startsWith("data:") ? "image from a data: URL" : url;
  return { name, fileName: null, mimeType: null, source: url, thumbnail: url };
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`Could not read ${file.name}.`));
    reader.readAsDataURL(file);
  });
}

async function canShow(source) {
  const probe = new Image();
  probe.src = source;
  try {
    await probe.decode();
    return true;
  } catch {
    return false;
  }
}
