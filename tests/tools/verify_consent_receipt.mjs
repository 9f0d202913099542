// Verify a Tell Us Once consent receipt with npm's `jose`, independently of the
// service's own Python code: fetch the JWKS from its well-known URL, check the
// EdDSA signature, the issuer and the algorithm, and print the header and claims
// as JSON. Exit 1 with jose's error code and message when the receipt does not hold.
//
//   node tests/tools/verify_consent_receipt.mjs <jwks-url> <issuer> < receipt.jwt
import { createRemoteJWKSet, jwtVerify } from "jose";

const [jwksUrl, issuer] = process.argv.slice(2);
if (!jwksUrl || !issuer) {
  console.error("usage: verify_consent_receipt.mjs <jwks-url> <issuer> < receipt.jwt");
  process.exit(2);
}
let token = "";
for await (const chunk of process.stdin) token += chunk;

try {
  const keys = createRemoteJWKSet(new URL(jwksUrl));
  const { payload, protectedHeader } = await jwtVerify(token.trim(), keys, {
    algorithms: ["EdDSA"],
    issuer,
    typ: "JWT",
  });
  console.log(JSON.stringify({ header: protectedHeader, claims: payload }));
} catch (error) {
  console.log(JSON.stringify({ error: error.code ?? error.name, message: error.message }));
  process.exit(1);
}
